"""The HTTP server of `kvyard serve`: OpenAI-compatible and SGLang-style native APIs.

uvicorn runs the FastAPI app (app.py) in the main process; the scheduler and the model run in
their own process. The app talks to them only through the TokenizerManager, so the event loop
never waits on model compute.
"""
