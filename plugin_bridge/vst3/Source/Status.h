// EngineStatus: what the editor shows and what the state's read-only <engine_status> node carries.
// Filled by UnbakeProcessor::engineStatus() (message thread; never from the audio thread).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace unbake
{
struct EngineStatus
{
    bool connected = false;          // a session is open and the engine answers
    std::string endpoint;            // where the plugin looks for the engine
    std::string model, device;       // the session's model and the engine's device ("cpu", "cuda:0")
    std::string line;                // one line: "connected", or why not ("no engine at ipc://...")
    std::vector<std::string> stems;  // the stems the model returns (others are silent)
    int latencySamples = 0;          // reported to the host (engine + own buffering), host rate
    double sampleRate = 0;           // the host's rate
    int64_t lateFrames = 0;          // stem frames replaced by silence because they came late
};
} // namespace unbake
