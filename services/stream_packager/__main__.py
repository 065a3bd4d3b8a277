"""python -m services.stream_packager: settings, logging, the effective config logged once, then the worker."""

from services.common.logging import configure_logging, get_logger
from services.stream_packager.worker import PackagerSettings, PackagerWorker


def main() -> None:
    settings = PackagerSettings()
    configure_logging(json_logs=settings.json_logs, level=settings.log_level)
    get_logger("stream-packager").info("config", **settings.log_safe())
    PackagerWorker(settings).run()


if __name__ == "__main__":
    main()
