"""The controller: a level-triggered reconcile loop and its pure policies."""
