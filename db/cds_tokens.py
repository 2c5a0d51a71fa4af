"""CDS Client JWTs already accepted: one row per (issuer, jti) until the token expires."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.schema import CdsHooksToken


def token_key(issuer: str, jti: str) -> str:
    """The row key of a token: a digest, so any length of jti fits and none is stored."""
    return hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()


def remember_token(session: Session, key: str, expires_at: datetime, now: datetime) -> bool:
    """Record a token in the caller's transaction; False if it was seen and has not
    expired. Expired rows are dropped on the way. Two transactions recording the same
    key at once: the second fails on the primary key when it commits (IntegrityError)."""
    session.execute(delete(CdsHooksToken).where(CdsHooksToken.expires_at < now))
    if session.execute(
        select(CdsHooksToken.token_key).where(CdsHooksToken.token_key == key)
    ).first():
        return False
    session.add(CdsHooksToken(token_key=key, expires_at=expires_at))
    session.flush()
    return True
