"""What the tests share: the devices an op test runs on (the CPU, a real GPU, the emulated CUDA
device), the emulation's loader and C++ sources, the op tests' cases, and the checkpoint worker.
README.md in this folder says how the emulated device works."""
