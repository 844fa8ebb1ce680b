"""schemathesis hooks for tests/test_server_fuzz.py (loaded through SCHEMATHESIS_HOOKS): every body sent asks
for at most 16 tokens, so that a case runs in a fraction of a second (`before_call` sees the cases of every
phase; `map_body` only the fuzzing phase's). A max_tokens that is not a valid count is left as it is: a negative
case must stay negative."""
import schemathesis

MAX_TOKENS = 16


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        given = body.get("max_tokens")
        if "max_tokens" not in body or given is None:
            body["max_tokens"] = MAX_TOKENS
        elif isinstance(given, int) and not isinstance(given, bool) and given > MAX_TOKENS:
            body["max_tokens"] = MAX_TOKENS
