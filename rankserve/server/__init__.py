"""OpenAI-compatible serving: ``app.create_app`` (FastAPI) over ``scheduler.Engine`` (continuous batching)."""
