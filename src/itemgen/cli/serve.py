"""`itemgen serve`: the HTTP server (serving/server.py) on uvicorn. Mounted in cli/__init__.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from itemgen.api import Predictor
from itemgen.cli.common import fail
from itemgen.models.checkpoint import CheckpointError, error_line, verify_checkpoint

# what each uvicorn worker process imports for --workers > 1 (a string: the serve extra may be missing)
APP_FACTORY = "itemgen.serving.server:app_from_env"


def serve(checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
          host: str = typer.Option("127.0.0.1", help="address to bind (loopback unless told otherwise)"),
          port: int = typer.Option(8000, min=0, max=65535),
          workers: int = typer.Option(1, min=1, help="server processes (each loads the model; sessions need 1)"),
          api_key_file: Optional[Path] = typer.Option(None, help="file holding the API key "
                                                              "(else $ITEMGEN_API_KEY; neither: no auth)"),
          batch_window_ms: float = typer.Option(2.0, min=0.0, help="wait this long for more requests to batch"),
          max_batch: int = typer.Option(32, min=1, help="histories per forward pass (1: micro-batching off)"),
          max_history: int = typer.Option(200, min=1, help="most items a request history may hold"),
          max_k: int = typer.Option(1000, min=1, help="largest k a request may ask for"),
          max_sessions: int = typer.Option(10_000, min=1, help="sessions kept (least recently used evicted)"),
          session_ttl_s: float = typer.Option(1800.0, min=1.0, help="idle seconds before a session expires"),
          max_body_bytes: int = typer.Option(1 << 20, min=1024, help="largest request body"),
          max_queue: int = typer.Option(1024, min=1, help="histories waiting for the model before requests get 503"),
          max_new_items: int = typer.Option(100, min=0, help="items one POST /v1/items may add (0: adding off); "
                                            "added items live in memory until restart"),
          threads: int = typer.Option(1, min=0, help="torch CPU threads per process (0: torch's default, one "
                                      "per core; 1 holds up best under concurrency, docs/serve.md)"),
          prefix_cache: bool = typer.Option(True, help="reuse the prompt prefix's keys/values (ItemLM)"),
          graceful_timeout_s: float = typer.Option(30.0, min=0.0,
                                                   help="how long shutdown waits for requests in flight"),
          client_timeout_s: float = typer.Option(10.0, min=0.1, help="seconds a client may take to send a "
                                                 "request head, and again its body, before it is closed"),
          access_log: bool = typer.Option(False, help="log every request"),
          log_level: str = typer.Option("info")):
    """Serve recommendations over HTTP (FastAPI on uvicorn); see docs/serve.md."""
    try:  # the serve extra: uvicorn, and fastapi (which serving/server.py imports)
        import uvicorn

        from itemgen.serving.http import protocol
        from itemgen.serving.server import SETTINGS_ENV, ServeSettings, create_app, read_api_key, settings_env
    except ImportError as e:
        fail(f"the server needs the serve extra (pip install 'itemgen[serve]'): {e}")
    try:
        # one line now, before uvicorn starts, rather than a traceback from its startup (or a worker's)
        verify_checkpoint(checkpoint)
        settings = ServeSettings(
            checkpoint=str(checkpoint), batch_window_ms=batch_window_ms, max_batch=max_batch,
            max_history=max_history, max_k=max_k, max_body_bytes=max_body_bytes, max_queue=max_queue, max_sessions=max_sessions,
            session_ttl_s=session_ttl_s, prefix_cache=prefix_cache, sessions_enabled=workers == 1,
            api_key_file=str(api_key_file) if api_key_file else None, threads=threads,
            max_new_items=max_new_items)
        settings.check()
        key = read_api_key(settings.api_key_file)
        # one process: load the model here (the app gets it) so that whatever else cannot load fails now
        predictor = _load(checkpoint) if workers == 1 else None
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("itemgen.serve")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: reachable from other machines%s", host,
                    "" if key else " and WITHOUT an API key (set --api-key-file or $ITEMGEN_API_KEY)")
    common = dict(host=host, port=port, log_level=log_level.lower(), access_log=access_log, server_header=False,
                  timeout_graceful_shutdown=graceful_timeout_s, http=protocol(client_timeout_s))
    if workers == 1:
        uvicorn.run(create_app(settings, predictor=predictor, api_key=key), **common)
    else:  # each worker process builds its own app (and model) from the settings in the environment
        os.environ[SETTINGS_ENV] = settings_env(settings)
        uvicorn.run(APP_FACTORY, factory=True, workers=workers, **common)


def _load(checkpoint: Path) -> Predictor:
    try:
        return Predictor.load(checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError):
        raise
    except Exception as e:  # a backbone folder that does not load, weights that do not fit, ...
        raise CheckpointError(f"cannot load the checkpoint {checkpoint}: {type(e).__name__}: {error_line(e)}") from None
