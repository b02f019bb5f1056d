"""Networks (plain `nn.Module`s) and the LightningModule that trains them."""
