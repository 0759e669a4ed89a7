"""The entry service's side of the prediction store (cxrlt.monitoring.store): one row per answered study.

Recording never fails a prediction: a store that is down or full costs a warning in the service log and a
count in GET /status (`prediction_store`: recorded, failed, the last failure's kind and time), never the
answer. The store is prepared at start (schema, one-time import of an earlier JSONL log); when that fails
too, the service starts anyway and every record retries the schema.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("cxrlt.service")


class Recorder:
    """Records scored studies in the prediction store and counts what happened."""

    def __init__(self, url: str | None = None) -> None:
        from cxrlt.monitoring.log_import import prepare_store
        from cxrlt.monitoring.store import open_store

        self.store = open_store(url)
        self.recorded = self.failed = 0
        self.last_error: dict | None = None
        self._lock = threading.Lock()
        try:
            prepare_store(self.store.url)
            logger.info("prediction store %s holds %d studies", self.store.masked, self.store.count())
        except Exception as e:  # start anyway: predictions are answered, and recording retries
            self._failure("prepare", e)

    def record(self, body: dict, study) -> bool:
        """Store one answered study (no identifiers: see cxrlt.monitoring.log.prediction_record)."""
        from cxrlt.monitoring.log import prediction_record

        try:
            self.store.record(prediction_record(model_tag=body["model_tag"], probabilities=body["probabilities"],
                                                views=study.views, image_stats=study.stats,
                                                synthetic_model=body["synthetic_model"]))
        except Exception as e:  # the answer is still right; the monitoring gap is counted and logged
            self._failure("record", e)
            return False
        with self._lock:
            self.recorded += 1
        return True

    def _failure(self, what: str, e: Exception) -> None:
        # the kind of failure only: a driver's message may quote the statement's values
        with self._lock:
            self.failed += what == "record"
            self.last_error = {"during": what, "error": e.__class__.__name__,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        logger.warning("prediction store %s: could not %s (%s); the answer was not affected",
                       self.store.masked, what, e.__class__.__name__)

    def status(self) -> dict:
        """What GET /status shows: the store (its URL without the password) and this worker's counts."""
        with self._lock:
            return {"store": self.store.masked, "recorded": self.recorded, "failed": self.failed,
                    "last_error": self.last_error}
