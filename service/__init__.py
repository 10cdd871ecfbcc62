"""blockserve's entry points: the `blockserve` command line today, the HTTP API later.

`service` may import `deployments` and `blocks`; nothing imports `service`.
"""
