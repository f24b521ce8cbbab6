// The extension module overlap._C. Its ops register through TORCH_LIBRARY static initialisers
// in the other .cpp files; importing this module is what runs them.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "overlap CUDA ops (torch.ops.overlap.*)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
