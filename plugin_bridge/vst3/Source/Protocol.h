// The unbake wire protocol, version 1 (engine/protocol.py is the reference): every message is
// [msgpack header map, raw little-endian float32 PCM frames in [channels, frames] C order...].
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace unbake::wire
{
constexpr int kProtocolVersion = 1;

std::string hello (int64_t id, const std::string& client);
// options: the session's open options (name, number), e.g. segment_s, context_s (protocol.OPTION_TYPES)
std::string open (int64_t id, const std::string& model, int sampleRate, int channels,
                  const std::vector<std::pair<std::string, double>>& options = {});
std::string push (int64_t id, const std::string& session, int channels, int frames);
std::string cancel (int64_t id, const std::string& session);

// A reply header, the fields this client reads (absent: empty / -1).
struct Reply
{
    bool valid = false;             // a msgpack map with v == 1 and a kind
    std::string kind;               // ready, stems, progress, done, error, hello, ...
    int64_t re = -1;                // the request id it answers (-1: None)
    std::string session, model, device, code, message;
    int64_t start = -1, frames = -1, channels = -1, latencySamples = -1, sampleRate = -1;
    std::vector<std::string> stems;
};

Reply parseReply (const void* data, size_t size);
} // namespace unbake::wire
