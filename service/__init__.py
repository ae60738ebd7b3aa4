"""HTTP service for the captioner: `service.app.create_app(settings)`; see docs/service.md."""
