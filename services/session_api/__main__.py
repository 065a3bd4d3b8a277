"""python -m services.session_api: settings, logging, the effective config logged once, then uvicorn."""

import uvicorn

from services.common.logging import configure_logging, get_logger
from services.session_api.app import create_app
from services.session_api.settings import ApiSettings


def main() -> None:
    settings = ApiSettings()
    configure_logging(json_logs=settings.json_logs, level=settings.log_level)
    get_logger("session-api").info("config", **settings.log_safe())
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
