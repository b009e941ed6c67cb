// The Python module palora_kernels._C: importing it registers the palora:: C++ ops.
#include <Python.h>

static struct PyModuleDef palora_module = {PyModuleDef_HEAD_INIT, "_C", "palora:: C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&palora_module); }
