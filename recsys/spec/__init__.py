"""Declarative job specs: the typed schema (`config`) and the only way to read one (`loader`)."""
from recsys.spec.config import Spec, check_references
from recsys.spec.loader import (check_domains_have_rows, dump_resolved, load_spec, project_root, resolve_path,
                                spec_hash, spec_source)

__all__ = ["Spec", "check_references", "load_spec", "resolve_path", "project_root", "spec_source",
           "dump_resolved", "spec_hash", "check_domains_have_rows"]
