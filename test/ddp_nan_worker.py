"""torchrun worker of test_ddp (not a test): ``recap-train-value`` whose loss is NaN on rank 1 from step 2 on."""
import os
import sys

from recap_ros.recap import cli, train_value

forward = train_value._ValueLoss.forward


def nan_on_rank_1(self, batch):
    loss = forward(self, batch)
    return loss * float("nan") if os.environ["RANK"] == "1" and batch.step >= 2 else loss


train_value._ValueLoss.forward = nan_on_rank_1
sys.exit(cli.train_value_main(sys.argv[1:]))
