"""Serving a trained model: a self-contained bundle (export), batch scoring and an online ranking service.

    from recsys.serving import Ranker
    ranker = Ranker.load("bundles/movielens")
    ranked = ranker.rank([ranker.parse({"domain": "ml_action", "context": {"user_id": "1"},
                                        "candidates": [{"item_id": "1"}, {"item_id": "50"}]})])
"""
from recsys.serving.bundle import Bundle, BundleError, load_bundle, verify  # noqa: F401
from recsys.serving.ranker import Ranker, RequestError  # noqa: F401
