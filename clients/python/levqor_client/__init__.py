"""Levqor's Python client: ``Client`` for the HTTP API, ``Worker`` to run
external workflows, ``verify_webhook`` for signed callbacks, and the
``levqor`` command line (``python -m levqor_client``). Standard library only.
"""

from .client import Client, Job
from .errors import (AuthError, BudgetExceeded, Conflict, LevqorConnectionError, LevqorError,
                     NotFound, RateLimited, ServerError, ValidationError)
from .webhooks import WebhookVerificationError, verify_webhook
from .worker import JobContext, Permanent, Worker

__version__ = "0.1.0"

__all__ = ["Client", "Job", "Worker", "JobContext", "Permanent", "verify_webhook",
           "WebhookVerificationError", "LevqorError", "LevqorConnectionError", "AuthError",
           "NotFound", "ValidationError", "Conflict", "RateLimited", "BudgetExceeded",
           "ServerError"]
