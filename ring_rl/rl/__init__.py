"""GRPO on Ray: data, rewards, the loss maths and the driver loop.

Import-light on purpose: `import ring_rl.rl` pulls in no torch, datasets or sympy; import the
submodule you need (ring_rl.rl.grpo, .data, .reward, .arith).
"""
