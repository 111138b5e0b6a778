"""The server's log lines: text, or on Vertex AI (--log-format json, which the AIP_* variables imply) one JSON object
a line, as Cloud Logging reads them: "severity" (INFO, WARNING, ERROR), "message", "time", the process and, on a
line about a request, its "request_id" (python-json-logger)."""

import logging

from serving.model_server.settings import ServerSettings

TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"


def configure(settings: ServerSettings) -> None:
    """The root logger writes the settings' format to stderr, at INFO (a second call replaces the first)."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(TEXT_FORMAT, rename_fields={"levelname": "severity", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
