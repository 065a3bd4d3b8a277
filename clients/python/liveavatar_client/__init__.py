"""Python client of the LiveAvatar session API.

- :class:`AsyncLiveAvatar` / :class:`AsyncSession` (asyncio) and :class:`LiveAvatar` / :class:`Session`
  (blocking): create and end sessions, stream audio (numpy or bytes, any sample rate), interrupt, speak
  text, read the live fMP4 media as :class:`MediaPiece` s.
- :mod:`liveavatar_client.errors`: one typed error per status of the API's error shape.
- :mod:`liveavatar_client.media` (extra ``[media]``): decode the fragments into RGB frames and PCM.
- :mod:`liveavatar_client.pipecat` (extra ``[pipecat]``): ``LiveAvatarVideoService`` for Pipecat pipelines.

The package never imports torch (nor numpy, unless you pass arrays).
"""

from liveavatar_client.aio import AsyncAudioStream, AsyncLiveAvatar, AsyncMediaStream, AsyncSession
from liveavatar_client.errors import ApiError, LiveAvatarError
from liveavatar_client.sync import AudioStream, LiveAvatar, MediaStream, Session
from liveavatar_client.types import BLOCK_S, FPS, AudioEvent, MediaPiece, SessionInfo, StreamReport

__version__ = "0.1.0"

__all__ = [
    "BLOCK_S", "FPS", "ApiError", "AsyncAudioStream", "AsyncLiveAvatar", "AsyncMediaStream", "AsyncSession",
    "AudioEvent", "AudioStream", "LiveAvatar", "LiveAvatarError", "MediaPiece", "MediaStream", "Session",
    "SessionInfo", "StreamReport",
]
