"""proxy/fallbacks/template.py: the response file format and its placeholders."""

from __future__ import annotations

import json

import pytest

from proxy.core.template import RenderContext, TemplateError, parse_response


def context(**overrides) -> RenderContext:
    values = {"breaker": "payment.charges", "state": "open", "reason": "open", "retry_after": 11.2,
              "retry_at_wall": 1_700_000_011.2, "method": "POST", "path": "/payment/charges/ch_1",
              "query": {"q": "a&b"}, "headers": {"X-Trace": "t\r\nInjected: 1"},
              "segments": ["charges", "ch_1"], "body": {"order": {"id": 'o-"1"'}, "amount": 5, "n": None},
              "now_wall": 1_700_000_000.0}
    values.update(overrides)
    return RenderContext(**values)


def spec_of(document: object):
    return parse_response("x.json", json.dumps(document).encode())


def test_a_constant_spec_renders_without_work():
    spec = spec_of({"status": 503, "body": {"error": "busy"}})
    assert (spec.status, spec.needs_body, spec.body.is_constant) == (503, False, True)
    assert [(name, value.render_text(None)) for name, value in spec.headers] == [
        ("Content-Type", "application/json")]
    assert json.loads(spec.body.render(None)) == {"error": "busy"}


def test_whole_string_placeholders_keep_their_json_type_others_are_escaped_text():
    spec = spec_of({"body": {"retry_after": "{{retry_after}}", "amount": "{{body.amount}}",
                             "missing": "{{body.nope}}", "order": "{{body.order}}",
                             "text": "id {{body.order.id}} in {{ segment.-1 }} via {{query.q}}",
                             "{{service}}": ["{{route}}", "{{state}} since {{now}}"]}})
    assert spec.needs_body is True
    assert json.loads(spec.body.render(context())) == {
        "retry_after": 12, "amount": 5, "missing": None, "order": {"id": 'o-"1"'},
        "text": 'id o-"1" in ch_1 via a&b',
        "payment": ["charges", "open since 2023-11-14T22:13:20.000Z"]}
    closed = json.loads(spec.body.render(context(retry_after=None, segments=[])))
    assert (closed["retry_after"], closed["text"]) == (None, 'id o-"1" in  via a&b')


def test_header_values_lose_control_characters():
    spec = spec_of({"headers": {"X-Echo": "{{header.X-Trace}}", "Retry-After": "{{retry_after}}"}, "body": "b"})
    assert [(n, v.render_text(context())) for n, v in spec.headers] == [
        ("X-Echo", "tInjected: 1"), ("Retry-After", "12"), ("Content-Type", "text/plain; charset=utf-8")]


def test_plain_files_by_extension():
    page = parse_response("down.html", b"<h1>{{query.q}}</h1>")
    assert page.headers[0][1].render_text(None) == "text/html; charset=utf-8"
    assert page.body.render(context()) == b"<h1>a&amp;b</h1>"
    text = parse_response("down.txt", b"{{query.q}}")
    assert text.body.render(context()) == b"a&b"
    image = parse_response("logo.png", b"\x89PNG{{x}}\xff")
    assert (image.headers[0][1].render_text(None), image.body.render(context())) == (
        "image/png", b"\x89PNG{{x}}\xff")


@pytest.mark.parametrize(("document", "message"), [
    ([1], "a .json response file must be an object with status, headers and body"),
    ({"status": True}, "status must be an HTTP status 100..599, got True"),
    ({"headers": []}, "headers must be an object of strings, got []"),
    ({"headers": {"Bad Name": "x"}}, "headers: 'Bad Name' is not a valid header name"),
    ({"headers": {"X-A": 1}}, "headers: X-A must be a string without control characters"),
    ({"headers": {"Transfer-Encoding": "chunked"}}, "headers: Transfer-Encoding is set by the proxy"),
    ({"body": "{{header.cookie}}"}, "placeholder {{header.cookie}} would echo a credential"),
    ({"body": "{{segment.last}}"}, "placeholder {{segment.last}}: segment needs an integer index"),
    ({"body": "{{breakr}}"}, ("unknown placeholder {{breakr}} (known: breaker, method, now, path, "
                              "reason, retry_after, retry_at, route, service, state, query.NAME, "
                              "header.NAME, segment.N, body.FIELD)")),
])
def test_unusable_specs_say_why(document, message):
    with pytest.raises(TemplateError) as error:
        spec_of(document)
    assert str(error.value).startswith(message)


def test_invalid_json_names_the_place():
    with pytest.raises(TemplateError, match="invalid JSON at line 2 column 1: Expecting value"):
        parse_response("x.json", b'{"body":\n')
