"""dataset.json is checked when it is read: file names are plain names (a path would read or write outside
the directory, e.g. when a run copies its tokenizer), special ids lie in the vocabulary, and (verify) the
tokenizer has no more tokens than vocab_size, so no token id can exceed the model's embedding."""
import json
import shutil

import pytest

from calm_train.data.dataset_info import DataError, read_dataset_info
from calm_train.data.verify import verify_dataset


@pytest.fixture
def data(tiny_data, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    return out


def edit(data, **changes):
    path = data / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("names", [{"tokenizer_files": ["tokenizer.json", "../../escape.json"]},
                                   {"tokenizer": "/etc/passwd"}, {"tokenizer_files": [".."]}])
def test_file_names_must_be_plain(data, names):
    edit(data, **names)
    with pytest.raises(DataError, match="is not a plain file name"):
        read_dataset_info(data)


def test_special_ids_and_tokenizer_fit_the_vocabulary(data):
    info = read_dataset_info(data)
    assert verify_dataset(data).vocab_size == info.vocab_size == 512
    edit(data, eos_id=info.vocab_size)
    with pytest.raises(DataError, match=r"'eos_id': 512\} outside the vocabulary of vocab_size=512"):
        read_dataset_info(data)
    edit(data, eos_id=3, pad_id=4, vocab_size=500)
    with pytest.raises(DataError, match="vocab_size=500 but its tokenizer tokenizer.json has 512 tokens"):
        verify_dataset(data)
