"""run_eagerly: a routing coroutine that never waits needs no Deferred; one that waits
still reaches the same callback or errback."""

from twisted.internet import defer

from apptunnel.proxy.eager import run_eagerly


def _record():
    seen = []
    return seen, (lambda v, tag: seen.append(("ok", v, tag))), \
        (lambda f, tag: seen.append(("err", f.value, tag)))


async def _cached():
    inner = await defer.succeed(1)          # a fired Deferred does not wait
    return inner + await _plain()


async def _plain():
    return 41


def test_a_coroutine_that_never_waits_is_answered_at_once():
    seen, ok, err = _record()
    run_eagerly(_cached(), ok, err, "t")
    assert seen == [("ok", 42, "t")]


def test_a_coroutine_that_waits_is_answered_when_its_wait_ends():
    seen, ok, err = _record()
    first, second = defer.Deferred(), defer.Deferred()

    async def slow():
        return await first + await second

    run_eagerly(slow(), ok, err, "t")
    assert seen == []
    first.callback(2)
    assert seen == []
    second.callback(3)
    assert seen == [("ok", 5, "t")]


def test_a_failed_wait_is_raised_inside_the_coroutine():
    seen, ok, err = _record()
    gate = defer.Deferred()

    async def guarded():
        try:
            await gate
        except KeyError:
            return "handled"
        return "not reached"

    run_eagerly(guarded(), ok, err, "t")
    gate.errback(KeyError("x"))
    assert seen == [("ok", "handled", "t")]


def test_errors_reach_the_errback_whether_or_not_the_coroutine_waited():
    seen, ok, err = _record()

    async def broken():
        raise ValueError("now")

    gate = defer.Deferred()

    async def broken_later():
        await gate
        raise ValueError("later")

    run_eagerly(broken(), ok, err, "a")
    run_eagerly(broken_later(), ok, err, "b")
    gate.callback(None)
    assert [(kind, str(value), tag) for kind, value, tag in seen] == [
        ("err", "now", "a"), ("err", "later", "b")]


def test_a_callback_that_raises_reaches_the_errback_like_a_deferred_chain():
    seen = []

    def ok(value, tag):
        raise RuntimeError("callback broke")

    run_eagerly(_cached(), ok, lambda f, tag: seen.append((str(f.value), tag)), "t")
    assert seen == [("callback broke", "t")]
