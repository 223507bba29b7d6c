"""Device runner: deploy, profile and validate artifacts on devices over local, SSH, adb, serial and TVM RPC.

Kept free of imports: the agent bundle ships a stub of this package to the device.
"""
