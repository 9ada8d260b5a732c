"""Cases run on every rank of the RankPool (tests/data/conftest.py); each returns plain data."""
import itertools

from calm_train.data.loader import TokenLoader


def _loader(data, dp_rank, dp_size, batch, workers=0, **kw):
    return TokenLoader(data, "train", batch_size=batch, dp_rank=dp_rank, dp_size=dp_size, seed=7,
                       num_workers=workers, **kw)


def one_epoch(rank, world, data, tp, batch, workers):
    """Every rank reads one epoch; returns [(sample_id, token sum)] in order."""
    loader = _loader(data, rank // tp, world // tp, batch, workers)
    out = []
    for b in loader:
        if loader.epoch > 0:
            break
        out += list(zip(b["sample_ids"].tolist(), b["tokens"].sum(1).tolist()))
    loader.close()
    return out


def first_part(rank, world, data, batches, batch, workers):
    """Read `batches` batches, return (sample ids, state)."""
    loader = _loader(data, rank, world, batch, workers)
    ids = [i for b in itertools.islice(loader, batches) for i in b["sample_ids"].tolist()]
    state = loader.state_dict()
    loader.close()
    return ids, state


def rest_of_epoch(rank, world, data, state, batch, workers):
    """Resume from `state` and read to the end of its epoch; returns (ids, epoch after)."""
    loader = _loader(data, rank, world, batch, workers)
    loader.load_state_dict(state)
    ids = []
    for b in loader:
        if loader.epoch != state["epoch"]:
            break
        ids += b["sample_ids"].tolist()
    epoch = loader.epoch
    loader.close()
    return ids, epoch


def expect_error(rank, world, data, batch, workers, timeout, verify):
    """Construct and read one epoch; return the exception's type and text (None if it ran through)."""
    try:
        loader = _loader(data, rank, world, batch, workers, verify=verify, batch_timeout=timeout)
        for _ in loader:
            if loader.epoch > 0:
                break
    except Exception as err:   # noqa: BLE001 - the test inspects what was raised
        return type(err).__name__, str(err)
    return None


def one_pass(rank, world, data, batch):
    """One bounded pass; returns [(sample ids, own mask)] per batch."""
    loader = _loader(data, rank, world, batch, shuffle=False)
    out = [(b["sample_ids"].tolist(), b["own"].tolist()) for b in loader.one_pass()]
    loader.close()
    return out
