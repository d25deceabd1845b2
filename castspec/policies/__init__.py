"""Tree policies. Every module in this package registers its policy; `make_policy("name:k=v")` builds one."""

import importlib
import pkgutil

from castspec.policies.base import StepContext, StepRecord, TreePolicy, make_policy, policy_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["StepContext", "StepRecord", "TreePolicy", "make_policy", "policy_names"]
