"""Credentials out of what the pipeline writes or prints: a URL's user-info and secret query values become "***"."""

from __future__ import annotations

import re

MASK = "***"

# Query parameters whose values are secrets in the URLs people put in MLFLOW_TRACKING_URI, VAE_DATA_MIRROR or
# PREFECT_API_URL: passwords and tokens, and the signature and credential of presigned S3/GCS/Azure URLs.
SECRET_QUERY_KEYS = (
    "password", "passwd", "pwd", "sslpassword", "secret", "client_secret", "token", "access_token", "auth",
    "api_key", "apikey", "key", "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
)

# scheme://user:password@host: everything between "://" and the last "@" before the host's end is user-info (a
# password may hold an unescaped "@"; urllib splits at the last one too). Quotes and brackets end it, so that a URL
# quoted in a message is redacted without eating the text around it.
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#'\"<>]*@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:" + "|".join(re.escape(key) for key in SECRET_QUERY_KEYS) + r")=)[^&#\s'\"<>]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the user-info of every URL in it and the values of secret query parameters replaced by "***".

    ``http://user:s3cret@host:5000/x?token=abc&n=1`` becomes ``http://***@host:5000/x?token=***&n=1``. The whole
    user-info goes, not only the password: a token is often sent as the user name (``https://TOKEN@host``).
    """
    text = _USER_INFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda match: f"{match['key']}{MASK}", text)
