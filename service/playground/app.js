// The blockserve playground: a form over the public API, no framework.
// Text-to-image runs as a background job (POST /v1/jobs, then its server-sent events with
// previews); an edit streams from POST /v1/images/edits (stream: true, partial images).
// Errors are shown as the API words them. Results of this session go to the gallery; a
// click on one puts its parameters (and seed) back into the form.
"use strict";

const form = document.getElementById("generate");
const progress = document.getElementById("progress");
const progressText = document.getElementById("progress-text");
const errorBox = document.getElementById("error");
const result = document.getElementById("result");
const gallery = document.getElementById("gallery");
const button = form.querySelector("button[type=submit]");
const KEY_STORAGE = "blockserve.apiKey";

form.api_key.value = localStorage.getItem(KEY_STORAGE) || "";
form.api_key.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, form.api_key.value);
  loadModels();
});

function headers(extra = {}) {
  const key = form.api_key.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    if (response.status === 401) document.getElementById("auth").open = true;
    showError(await apiError(response));
    return;
  }
  showError("");
  const models = (await response.json()).data;
  form.model.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  await loadModel();
}

async function loadModel() {
  const response = await fetch(`/v1/models/${encodeURIComponent(form.model.value)}`,
                               { headers: headers() });
  if (!response.ok) return showError(await apiError(response));
  const detail = await response.json();
  form.size.replaceChildren(...detail.sizes.map((s) => new Option(s, s)));
  form.size.value = detail.defaults.size;
  form.num_inference_steps.placeholder = `default ${detail.defaults.steps}`;
}
form.model.addEventListener("change", loadModel);

// Server-sent events from a fetch response: yields {event, data} as they arrive.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function showProgress(step, total, preview) {
  progress.max = total;
  progress.value = step;
  progress.dataset.step = String(step);
  progressText.textContent = `step ${step} / ${total}`;
  if (preview) {
    progress.dataset.previews = String(Number(progress.dataset.previews) + 1);
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${preview}`;
    img.alt = `preview at step ${step}`;
    img.className = "preview";
    result.replaceChildren(img);
  }
}

function showResult(b64, params) {
  const src = `data:image/${params.output_format || "png"};base64,${b64}`;
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = params.prompt;
  const caption = document.createElement("figcaption");
  caption.textContent = `${params.model} · ${params.size} · ${params.steps} steps · seed ${params.seed}`;
  figure.append(img, caption);
  result.replaceChildren(figure);
  const item = document.createElement("li");
  item.dataset.seed = String(params.seed);
  item.title = "use these parameters again";
  const thumb = img.cloneNode();
  const label = document.createElement("figcaption");
  label.textContent = `${params.prompt} (seed ${params.seed})`;
  item.append(thumb, label);
  item.addEventListener("click", () => {
    form.prompt.value = params.prompt;
    form.negative_prompt.value = params.negative_prompt || "";
    form.model.value = params.model;
    form.size.value = params.size;
    form.num_inference_steps.value = params.steps;
    form.seed.value = params.seed;
  });
  gallery.prepend(item);
}

function fields() {
  const body = { prompt: form.prompt.value, model: form.model.value, size: form.size.value };
  if (form.negative_prompt.value.trim()) body.negative_prompt = form.negative_prompt.value;
  if (form.num_inference_steps.value) body.num_inference_steps = Number(form.num_inference_steps.value);
  if (form.seed.value) body.seed = Number(form.seed.value);
  return body;
}

async function generate(body) {
  const created = await fetch("/v1/jobs", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, preview: true }),
  });
  if (!created.ok) return showError(await apiError(created));
  const job = await created.json();
  showProgress(0, job.total_steps);
  const stream = await fetch(`/v1/jobs/${job.id}/events`, { headers: headers() });
  if (!stream.ok) return showError(await apiError(stream));
  for await (const { event, data } of events(stream)) {
    if (event === "progress") showProgress(data.step, data.total_steps, (data.previews || [])[0]);
    else if (event === "completed") {
      const item = data.result.data[0];
      showResult(item.b64_json, { ...body, size: data.result.size, steps: data.total_steps,
                                  seed: item.seed, output_format: data.result.output_format });
    } else if (event === "failed" || event === "cancelled") showError(data.error.message);
  }
}

async function edit(body) {
  const data = new FormData();
  for (const [name, value] of Object.entries(body)) data.append(name, String(value));
  data.append("image", form.image.files[0]);
  if (form.mask.files.length) data.append("mask", form.mask.files[0]);
  data.append("stream", "true");
  data.append("partial_images", "3");
  const response = await fetch("/v1/images/edits", { method: "POST", headers: headers(), body: data });
  if (!response.ok) return showError(await apiError(response));
  let partials = 0;
  for await (const { event, data: item } of events(response)) {
    if (event === "image_edit.partial_image") showProgress(++partials, 4, item.b64_json);
    else if (event === "image_edit.completed") {
      showProgress(4, 4);
      showResult(item.b64_json, { ...body, size: item.size, steps: body.num_inference_steps || "default",
                                  seed: item.seed, output_format: item.output_format });
    } else if (event === "error") showError(item.error.message);
  }
}

form.addEventListener("submit", async (submitted) => {
  submitted.preventDefault();
  showError("");
  progress.dataset.previews = "0";
  button.disabled = true;
  try {
    const body = fields();
    await (form.image.files.length ? edit(body) : generate(body));
  } catch (error) {
    showError(String(error));
  } finally {
    button.disabled = false;
  }
});

loadModels();
