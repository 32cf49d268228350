"""One request to the API server below the generated client, and the encodings
server-side apply needs: apply bodies, the managedFields an apply owns, API errors.

client-go's `rest` layer, as it were: nothing here knows a kind. Responses are read as
plain JSON (no model deserialization): the watch store holds plain dicts too, and the
controller's comparisons work on those. Everything here is synchronous and runs in worker
threads.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TIMEOUT = (5, 30)

# What an apply body escapes: what YAML refuses raw (DEL, C1 controls, U+FFFE/U+FFFF, lone
# surrogates), what YAML 1.1 reads as a line break, folded into a space inside a quoted
# scalar (NEL: measured; U+2028, U+2029), and the BOM. json.dumps escapes C0 controls.
_YAML_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def apply_body(manifest: dict[str, Any]) -> bytes:
    """A manifest as an apply-patch+yaml body: JSON (which is YAML) in UTF-8 text.

    json.dumps' default, ASCII with escapes, escapes characters beyond U+FFFF as UTF-16
    surrogate pairs, which the API server's YAML decoder refuses ('invalid Unicode
    character escape code'); raw, it refuses control characters. So: raw text, but for
    those, escaped (BMP characters, whose escapes YAML reads; a lone surrogate, which a
    string from the API server never holds, stays refused)."""
    text = json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


def api_message(err: ApiException) -> str:
    """The API server's own message (it names the offending field), else the reason."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or err.reason or err.status)


def error_details(err: ApiException) -> dict[str, Any]:
    """The `details` of an error's Status: empty for a bare error (a failed JSON-patch
    test), set when the server names what it refused."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        return {}
    details = body.get("details") if isinstance(body, dict) else None
    return details if isinstance(details, dict) else {}


def request(
    api_client: client.ApiClient,
    method: str,
    path: str,
    *,
    body: Any = None,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
    timeout: Any = TIMEOUT,
) -> dict[str, Any]:
    """One request below the generated API; the answer as plain JSON. Raises ApiException
    on non-2xx, as the generated methods do."""
    method, url, headers, serialized, post_params = api_client.param_serialize(
        method=method,
        resource_path=path,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api_client.call_api(
        method,
        url,
        header_params=headers,
        body=serialized,
        post_params=post_params,
        _request_timeout=timeout,
    )
    resp.read()  # type: ignore[no-untyped-call]
    if not 200 <= resp.status <= 299:
        raise ApiException.from_response(http_resp=resp, body=None, data=None)
    data: dict[str, Any] = json.loads(resp.data or b"{}")
    return data


def applied_fields(fields: Any, sent: Any, *, item: bool = False) -> dict[str, Any]:
    """The part of a managedFields set (FieldsV1) that an apply of `sent` would own.

    A create records every field of the object as stored, the ones the server defaulted
    included; owned by an applier, those would be taken out by its next apply (and put
    back as defaults: a needless write, a Deployment's generation bumped). Keys: `f:NAME`
    a field, `k:{...}` the list entry with those key values, `v:VALUE` a set member, `.`
    the node itself. An apply records `.` for list entries only, and no empty map (as
    measured on v1.20: the set equals the one of an apply of the same manifest)."""
    out: dict[str, Any] = {}
    for key, sub in (fields or {}).items():
        if key == ".":
            if item:
                out[key] = sub
        elif key.startswith("f:") and isinstance(sent, dict) and key[2:] in sent:
            value = sent[key[2:]]
            if value != {}:
                out[key] = applied_fields(sub, value)
        elif key.startswith(("k:", "v:")) and isinstance(sent, list):
            try:
                wanted = json.loads(key[2:])
            except ValueError:
                continue
            if key.startswith("v:"):
                if wanted in sent:
                    out[key] = sub
                continue
            match = next(
                (
                    i
                    for i in sent
                    if isinstance(i, dict)
                    and isinstance(wanted, dict)
                    and all(i.get(k) == v for k, v in wanted.items())
                ),
                None,
            )
            if match is not None:
                out[key] = applied_fields(sub, match, item=True)
    return out


def segment(value: str) -> str:
    """A name or namespace as one URL path segment."""
    return quote(value, safe="")
