"""The OpenAI-compatible HTTP API in front of the fleet (`clipfleet serve`).

The API server holds no model: it sends requests to the workers through Redis and object storage. Import
`producer.api.app.create_app` for the ASGI app; importing this package alone loads nothing heavy.
"""
