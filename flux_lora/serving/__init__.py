"""The serving stage: the Cog schema, the real cog HTTP server and the `flux-lora` command line.

It turns people's and HTTP clients' inputs into calls of the service (flux_lora.service), nothing more.
"""
