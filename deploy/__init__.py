"""Deployment: putting the worker on a line PC as a systemd service (:mod:`deploy.install`)."""
