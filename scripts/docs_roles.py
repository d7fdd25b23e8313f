"""MkDocs hook: Sphinx roles in docstrings (``:func:`load_model```) shown as code in the API pages.

The docstrings cross-reference with Sphinx roles, which mkdocstrings passes through as text
(":meth:" before the name). This drops the role and, for ``~a.b.name``, the path before the name.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):<code>(~?)([^<]+)</code>")


def _code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Replace each ``:role:<code>target</code>`` of the rendered page by ``<code>target</code>``."""
    return ROLE.sub(_code, html)
