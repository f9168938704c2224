"""fake_upstreams/page.py: the control page, rendered by the server, works without JavaScript
(forms POST and come back with a 303), explains every mode and links to the proxy's status page.
Checked over HTTP and in a real headless Chromium with JavaScript turned off."""

from __future__ import annotations

from html.parser import HTMLParser

import aiohttp
import pytest

from fake_upstreams import SERVICE_NAMES, FakeUpstreams, Mode
from fake_upstreams.page import MODE_HELP, form_mode
from fake_upstreams.modes import ModeError
from tests.browser import screenshot


class Page(HTMLParser):
    """What a browser without JavaScript sees: the table's cells by service, forms, links."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.forms: list[tuple[str, str]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._service: str | None = None
        self._field: str | None = None
        self.feed(html)
        self.all_text = "".join(self.text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("data-service"):
            self._service = attributes["data-service"]
            self.cells[self._service] = {}
        elif tag == "td" and self._service and attributes.get("data-field"):
            self._field = attributes["data-field"]
        elif tag == "form":
            self.forms.append((str(attributes.get("method")), str(attributes.get("action"))))
        elif tag == "a":
            self.links.append(str(attributes.get("href")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._field = None
        elif tag == "tr":
            self._service = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._service and self._field:
            self.cells[self._service][self._field] = self.cells[self._service].get(self._field, "") + data


async def page(http: aiohttp.ClientSession, fakes: FakeUpstreams, query: str = "") -> Page:
    async with http.get(f"{fakes.control_url}/{query}") as response:
        assert (response.status, response.content_type) == (200, "text/html")
        return Page(await response.text())


async def submit(http: aiohttp.ClientSession, fakes: FakeUpstreams, action: str, form: dict[str, str]) -> str:
    """POST a form as a browser does; the 303's Location."""
    async with http.post(f"{fakes.control_url}{action}", data=form, allow_redirects=False) as response:
        assert response.status == 303
        return response.headers["Location"]


async def test_the_table_is_in_the_html_with_a_form_per_service(fakes, http):
    await fakes.set_mode("payment", "error", status=503)
    async with http.post(f"{fakes.url('payment')}/charges", json={"amount": 1, "currency": "EUR",
                                                                   "order_id": "o"}) as response:
        assert response.status == 503
    seen = await page(http, fakes)
    assert list(seen.cells) == list(SERVICE_NAMES)
    assert seen.cells["payment"] == {"mode": "error", "options": "status=503 rate=1.0", "requests": "1",
                                     "recorded": "0"}
    assert seen.cells["shipping"]["mode"] == "healthy"
    for name in SERVICE_NAMES:
        assert ("post", f"/page/services/{name}/mode") in seen.forms
        assert ("post", f"/page/services/{name}/reset") in seen.forms
        assert f"{fakes.url(name)}/" in seen.links


async def test_every_mode_is_explained_and_the_status_page_is_linked(http):
    assert set(MODE_HELP) == set(Mode)
    async with FakeUpstreams(base_port=0, status_url="http://127.0.0.1:18080/status") as fakes:
        seen = await page(http, fakes)
    text = seen.all_text
    for mode in Mode:
        assert f"{mode.value}: " in text
    assert "never answers" in text and "refused" in text and "period_s" in text
    assert "http://127.0.0.1:18080/status" in seen.links
    async with FakeUpstreams(base_port=0) as fakes:
        assert "http://127.0.0.1:8080/status" in (await page(http, fakes)).links


async def test_a_form_sets_the_mode_and_comes_back_to_the_page_saying_so(fakes, http):
    location = await submit(http, fakes, "/page/services/inventory/mode",
                            {"mode": "flap", "status": "502", "rate": "1", "latency_ms": "2000", "period_s": "3"})
    assert fakes.mode("inventory").as_dict() == {"mode": "flap", "status": 502, "period_s": 3.0}
    seen = await page(http, fakes, location.lstrip("/"))
    assert "inventory is now flap status=502 period_s=3.0" in seen.all_text
    assert seen.cells["inventory"]["mode"] == "flap (now healthy)"
    # Fields a mode does not take are left out, so any mode can be sent from the same form.
    await submit(http, fakes, "/page/services/inventory/mode", {"mode": "hang", "status": "500", "period_s": ""})
    assert fakes.mode("inventory").as_dict() == {"mode": "hang"}


async def test_a_bad_form_changes_nothing_and_the_page_says_why(fakes, http):
    location = await submit(http, fakes, "/page/services/payment/mode", {"mode": "error", "status": "99"})
    assert fakes.mode("payment").mode == "healthy"
    assert "payment: status must be an integer from 400 to 599, got 99" in (
        await page(http, fakes, location.lstrip("/"))).all_text
    location = await submit(http, fakes, "/page/services/payment/mode", {"mode": "slow", "latency_ms": "soon"})
    assert "latency_ms must be a number, got 'soon'" in (await page(http, fakes, location[1:])).all_text
    location = await submit(http, fakes, "/page/services/warehouse/mode", {"mode": "down"})
    assert "unknown service 'warehouse'" in (await page(http, fakes, location[1:])).all_text


async def test_the_reset_form_clears_records_and_heals(fakes, http):
    async with http.post(f"{fakes.url('notification')}/notifications",
                         json={"to": "a@example.com", "template": "t"}) as response:
        assert response.status == 202
    await fakes.set_mode("notification", "down")
    await submit(http, fakes, "/page/services/notification/reset", {})
    assert (fakes.mode("notification").mode, fakes.service("notification").records) == ("healthy", [])


def test_form_mode_keeps_only_the_options_of_the_mode():
    assert form_mode({"mode": "error", "status": "503", "rate": "0.5", "latency_ms": "9"}) == {
        "mode": "error", "status": 503, "rate": 0.5}
    assert form_mode({"mode": "nonsense", "status": "x"}) == {"mode": "nonsense"}  # parse_mode says why
    with pytest.raises(ModeError, match="period_s must be a number"):
        form_mode({"mode": "flap", "period_s": "often"})


async def test_without_javascript_a_person_can_take_a_service_down_in_chromium(fakes, browser):
    context = await browser.new_context(java_script_enabled=False)
    tab = await context.new_page()
    await tab.goto(f"{fakes.control_url}/")
    row = tab.locator('tr[data-service="payment"]')
    assert await row.locator('[data-field="mode"]').text_content() == "healthy"
    await row.locator('select[name="mode"]').select_option("down")
    await row.get_by_role("button", name="set", exact=True).click()
    await tab.wait_for_load_state()
    assert fakes.mode("payment").mode == "down"
    assert await row.locator('[data-field="mode"]').text_content() == "down"
    assert "payment is now down" in await tab.locator(".notice").text_content()
    await screenshot(tab, "fake-upstreams-control-page.png")
