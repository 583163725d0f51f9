#include "tuning.h"

namespace fastconv {

Tuning& tuning() {
  static Tuning values;
  return values;
}

}  // namespace fastconv
