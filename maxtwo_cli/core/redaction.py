"""Keeping database passwords out of every message: what a text may quote of one, masked.

Light on purpose (only `re`): the CLI masks its usage errors with it before any database code
is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

# A URL's password (scheme://user:PASSWORD@host): up to the last "@" of the word, so that an
# unencoded "@" or "/" in the password does not leave its end showing. The user may hold an "@"
# (Azure's USER@SERVER, which the URL parser takes whole: core/db.py): it showed the password.
_URL_PASSWORD = re.compile(r"(://[^\s/:]*:)\S*(@)")
# Then one holding a space (libpq takes "pw secret" whole, and Click quotes such an argument
# back: a review): up to the last "@" before a quote, a parenthesis, the line's end or another
# "://", the bounds of what a message quotes (a driver's detail in parentheses after the URL
# keeps its "@"s). NOTE: a password holding a space and one of those, unencoded, is cut there.
_URL_PASSWORD_SPACED = re.compile(r"""(://[^\s/:]*:)(?:(?!://)[^\r\n"'()])*(@)""")
# libpq's secret keywords, in a connection string (password=...) or a URL's query (?password=...),
# their value quoted either way or bare.
_KEYWORD_SECRET = re.compile(
    r"""(?i)\b((?:ssl)?password|sslkey)(\s*=\s*)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&]+)"""
)
# The URL help's placeholder (USER:PASSWORD@HOST), masked like any URL above, is put back: the
# help read "USER:***@HOST" in every error that gave it, and the word PASSWORD in its place tells
# nothing of any real password.
_PLACEHOLDER = "://USER:PASSWORD@HOST"
_PLACEHOLDER_MASKED = f"://USER:{MASK}@HOST"
# A quoted value: its quotes standing apart from letters and digits (the "'" of "URL's" opens none).
_QUOTED = re.compile(r"""(?<![0-9A-Za-z])(["']).*?\1(?![0-9A-Za-z])""")


def mask_secret_syntax(text: str) -> str:
    """`text` with every password=... value, and the password of every URL in it, masked.

    NOTE: the keywords first: an "@" in a ?password= value ended the URL's mask there (the
    port's ":" taken for the password's start), and the rest of the value was shown."""
    text = _KEYWORD_SECRET.sub(rf"\g<1>\g<2>{MASK}", text)
    for url_password in (_URL_PASSWORD, _URL_PASSWORD_SPACED):
        text = url_password.sub(rf"\g<1>{MASK}\g<2>", text)
    return text.replace(_PLACEHOLDER_MASKED, _PLACEHOLDER)


def redact_text(text: str, secrets: Iterable[str] = (), public: Iterable[str] = ()) -> str:
    """`text` with the secrets it may quote masked: in URL and keyword syntax whatever their
    value (mask_secret_syntax), and each of `secrets` where it stands as a word of its own in a
    quoted value ("..." or '...': drivers and libraries quote what they echo, 'p4ssw0rd').

    NOTE: not as any substring, nor as a word of the message's own text: masking every "s" gave
    a password "s" away ("pa***word", "the URL'*** host"). And not at all for a secret that is
    also a word of a `public` part of the URL (user, host, port, database: what a driver's
    messages quote): a password "maxtwo" for the user "maxtwo", masked in 'for user "maxtwo"',
    would tell what the password is."""
    public = list(public)
    # The secrets first, and the longest first: the syntax's masks, or a shorter secret's, would
    # leave a longer one in pieces that no longer match whole.
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        word = _word(secret)
        if not any(word.search(part) for part in public):
            text = _QUOTED.sub(lambda quoted, word=word: word.sub(MASK, quoted.group(0)), text)
    return mask_secret_syntax(text)


def _word(secret: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])")
