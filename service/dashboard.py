"""Admin dashboard (placeholder until the dashboard lands)."""

from __future__ import annotations

from flask import Blueprint

dashboard = Blueprint("dashboard", __name__, url_prefix="/admin")
