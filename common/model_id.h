// Names under which a model is announced and looked up in the swarm.
#pragma once

#include <string>

namespace pollen {

// Returns the model id used when none is given: the last component of the
// checkpoint folder's path ("/models/stories260k/" -> "stories260k"). Nodes
// and clients of one model must agree on it; --model-id overrides it.
std::string DefaultModelId(const std::string& model_dir);

}  // namespace pollen
