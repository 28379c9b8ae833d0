"""Max pooling over the tiles of a bag, then a linear layer."""

from pydantic import Field

from histobench.components import Aggregator


class MaxPool(Aggregator):
    """Element-wise max over real tiles, then a linear classifier."""

    name = "max-pool"

    class Options(Aggregator.Options):
        dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the linear layer.")

    def build(self, in_dim: int, n_outputs: int):
        from torch import nn

        dropout = self.options.dropout

        class _MaxPool(nn.Module):
            def __init__(self):
                super().__init__()
                self.drop = nn.Dropout(dropout)
                self.fc = nn.Linear(in_dim, n_outputs)

            def forward(self, x, mask):
                pooled = x.masked_fill(~mask[..., None], float("-inf")).amax(1)
                return self.fc(self.drop(pooled)), None

        return _MaxPool()
