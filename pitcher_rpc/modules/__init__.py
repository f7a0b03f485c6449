"""Modules: optional behaviour attached to the request path at six named hook points.

The core runs each request through fixed phases; a module subscribes to a
hook by defining the method named after it. See :mod:`.base` for the module
contract and :mod:`.chain` for how the handlers of one route are ordered,
isolated and switched on and off.
"""

from .base import Answer, Hook, Module
from .chain import HookChains, ModuleFailure

__all__ = ["Answer", "Hook", "HookChains", "Module", "ModuleFailure"]
