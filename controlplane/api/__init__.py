"""The admin API: FastAPI over a ControlPlane (see main.create_app)."""
