"""The API's routes, one module per area; :func:`services.session_api.app.create_app` includes them all."""

from services.session_api.routes import audio, media, sessions, site, speak, usage, webrtc

ROUTERS = (site.router, sessions.router, audio.router, speak.router, media.router, webrtc.router, usage.router)
