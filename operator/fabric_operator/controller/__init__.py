"""The reconcile loop: kopf wiring at the edge, pure decisions inside."""
