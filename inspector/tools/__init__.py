"""Client tools as libraries: the camera simulator (``inspector publish``), the result tail
(``inspector tail``) and the reconciliation of what was sent against what was published
(``inspector reconcile``). The worker never imports them; the CLI wraps them thinly."""
