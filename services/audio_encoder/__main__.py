"""python -m services.audio_encoder: settings, logging, the effective config logged once, then the worker."""

from services.audio_encoder.worker import AudioEncoderSettings, AudioEncoderWorker
from services.common.logging import configure_logging, get_logger


def main() -> None:
    settings = AudioEncoderSettings()
    configure_logging(json_logs=settings.json_logs, level=settings.log_level)
    get_logger("audio-encoder").info("config", **settings.log_safe())
    AudioEncoderWorker(settings).run()


if __name__ == "__main__":
    main()
