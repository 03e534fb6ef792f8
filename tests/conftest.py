import os

# Multi-process tests on 2 cores stall with several OpenMP threads per process (feasibility.md §1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before the kernels
# are defined (feasibility.md §2). On a GPU machine the same tests run the compiled kernels.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def random_bytes_and_lengths(n_per_length: int, pos_dim: int, *, generator=None):
    """Tokens of every length 0..pos_dim (n_per_length each), random bytes; bytes past L are 0."""
    lengths = torch.arange(pos_dim + 1).repeat_interleave(n_per_length)
    table = torch.randint(0, 256, (len(lengths), pos_dim), dtype=torch.uint8, generator=generator)
    table[torch.arange(pos_dim)[None, :] >= lengths[:, None]] = 0
    return table, lengths.to(torch.int16)
