"""What the tests share: the in-process CLI runner and reference math (helpers), the loopback
fake Hub (fake_hub, fake_hub_wire) and the model-family fixtures of Twin, RCP and the zoo."""
