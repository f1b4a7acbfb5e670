// Defaults for the sanitizer runtimes of the test binaries (an environment variable of the
// same name still overrides them): the first report aborts the test, so ctest fails on it.
// Unused in an uninstrumented build, where nothing calls these.
extern "C" {

const char* __asan_default_options() { return "halt_on_error=1:detect_leaks=1:strict_string_checks=1"; }
const char* __ubsan_default_options() { return "halt_on_error=1:print_stacktrace=1"; }
const char* __tsan_default_options() { return "halt_on_error=1:second_deadlock_stack=1"; }

}  // extern "C"
