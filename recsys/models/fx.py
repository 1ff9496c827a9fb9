"""Whether forward is being fx-traced: TorchRec's train pipeline symbolically traces the model once, only to find
the embedding modules' inputs (the traced graph is never run), and parts of forward take a plain path then.

Recent torch (2.11 and 2.13 seen) logs a deprecation warning on the first call of `is_fx_tracing`; its successor
`is_fx_symbolic_tracing` answers the same question for symbolic tracing, so our code asks that one (a torch without
it falls back to the old function). TorchRec's own modules (regroup, feature processors) still call the old one; the
jobs' logging sends that one warning to the run's log file, not the console."""
from torch.fx import _symbolic_trace

fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
