"""The Ray Serve application behind pipelines/serve.py (which documents the endpoints).

config.py      ServeConfig: models, request limits, scaling, HTTP
loading.py     one generation of models, loading only what changed
models.py      the `Models` replica: reload, batched encode / decode, token sampling
validation.py  request models and the checks on every value
api.py         the FastAPI ingress `Api`: error handlers and endpoints
app.py         bind / build_app / start
"""
