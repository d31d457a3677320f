from kingpost.api.app import ControlPlane, create_app

__all__ = ["ControlPlane", "create_app"]
